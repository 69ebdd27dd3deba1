import sys

from pspnet_tf.cli import main

sys.exit(main())
