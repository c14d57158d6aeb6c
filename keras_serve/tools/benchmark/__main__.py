import sys

from keras_serve.tools.benchmark.cli import main

sys.exit(main())
