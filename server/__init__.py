"""OpenAI-compatible localist server with an audit store."""
