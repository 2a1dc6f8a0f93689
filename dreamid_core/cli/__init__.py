"""The command line ``python -m dreamid_core``: photos -> aligned faces (and S* with an encoder), ``--info``
about an encoder file, and ``download`` of the public model files the workflows list.

- :mod:`.main`: the commands; :mod:`.runner`: exit codes and one-line errors for every command of the
  pack (the training commands use it too); :mod:`.download`: fetching from the hub.
"""
