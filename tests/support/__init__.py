"""Support code for the tests: fixtures built with PEFT itself, tiny models, helpers, child runners."""
