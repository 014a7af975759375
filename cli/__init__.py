"""The `raywatch` command: thin commands over the stages below."""
