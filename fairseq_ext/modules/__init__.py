"""Mechanisms shared by several components: schedules, model driving, scheduled-sampling math."""
