"""What trains, and how fast: ``schedule`` (lr schedule, unfreeze timetable), ``freezing``
(``requires_grad`` and BatchNorm mode), ``param_groups`` (layer-wise lr, no decay on norms/biases),
``optim`` (one optimizer over named groups), ``losses``, ``dryrun`` (the group table), ``linear_probe``
(the L-BFGS logistic-regression solver of the linear probe).

May import ``trainer.config``, ``trainer.models``, ``trainer.files`` and ``trainer.data`` (the dry run lists the
configured data for its class count, writing nothing).

May import: trainer.config, trainer.data, trainer.models, trainer.files.
"""
