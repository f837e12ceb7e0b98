"""The C inference engine: csrc/*.c built as libengine.so, and engine.py, its Python binding."""
