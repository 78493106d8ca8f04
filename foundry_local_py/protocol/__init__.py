"""OpenAI (and Foundry Local) wire types. Pydantic only: nothing here imports engine code."""
