from pspnet_tf.cli import console

console()
