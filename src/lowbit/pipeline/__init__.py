"""Each quantization mode as a list of passes (full.py, weight.py, dynamic.py), run by one pipeline
(passes.py) over one data engine (engine.py), sharing one state (state.py)."""
