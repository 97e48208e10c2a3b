"""Stateful rule evaluation: state machines fed with the step hits of single-event matching."""
