"""The passes that quantization modes are made of, one module each (see :mod:`lowbit.pipeline.passes`)."""
