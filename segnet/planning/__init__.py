"""``segnet-plan``: configure an experiment from the data, in the open.

* ``fingerprint``: read and check every case once; spacings, shapes, intensities, classes.
* ``rules``: pure functions from a fingerprint (and the hardware) to choices, each with the
  one-line reason that is printed and written above its key in the YAML.
* ``timing``: time real training steps of the chosen network on this machine.
* ``writer``: the commented YAML, checked by the strict config parser before it is written.
* ``planner``: the command's body, tying the four together.
"""
