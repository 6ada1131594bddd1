"""Shipped YAML classification schedules (read with ``core.profiles``)."""
