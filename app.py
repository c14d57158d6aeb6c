"""Start the server: `python app.py --help` lists every option (see keras_serve/settings.py)."""
import sys

from keras_serve import create_app  # noqa: F401  (the product card's entry point: app.create_app)
from keras_serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
