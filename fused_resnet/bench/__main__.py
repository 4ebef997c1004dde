import sys

from fused_resnet.bench.cli import main

sys.exit(main())
