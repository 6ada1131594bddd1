"""Shipped YAML classification schedules (read with ``core.io.profiles``)."""
