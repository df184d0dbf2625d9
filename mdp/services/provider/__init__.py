"""The provider service."""
