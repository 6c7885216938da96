"""petune inside other libraries' training tools: one module per library (`trainer.py`: transformers, TRL)."""
