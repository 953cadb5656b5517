"""minigpt: build, train, evaluate and talk to your own small GPT from the terminal."""

__version__ = "0.1.0"
