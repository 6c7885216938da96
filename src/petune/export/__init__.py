"""Export what petune trained for other runtimes: GGUF for llama.cpp and Ollama, and merged transformers folders.

- `command.py`: `petune export` (options, formats, checks, the Ollama Modelfile beside a GGUF export);
- `gguf_model.py`: a whole model as one GGUF file; `gguf_lora.py`: a LoRA as a llama.cpp adapter GGUF;
- `architectures.py`: tensor names and layouts per architecture; `vocab.py`: the tokenizer as GGUF metadata;
- `outtypes.py`: the weight types and their cost; `output.py`: atomic writes; `modelfile.py`: Ollama.
"""
