"""pagoda: a fast, portable LLM serving engine."""
