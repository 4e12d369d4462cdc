"""Conversations on top of the engine (history, context trimming); tools and reasoning build here."""

from .conversation import Conversation

__all__ = ["Conversation"]
