"""The process executor: offloaded callbacks in warm worker processes.

One worker process (or `configure_workers(processes=n)`) serves every
process-offloaded callback of the training process, each callback on a
thread of its own there (`pool.py`, `worker.py`).

Data flow, for one lane (`executor.py` forwards, `runner.py` is the
training side of the boundary, `worker.py` the other):

    training thread                forwarding thread          worker process
    ---------------                -----------------          --------------
    hook -> snapshot into a        takes tasks in order,      loads each message
    shared buffer (shared_memory)  sends each (runner.py) ->  part, maps the buffer
    -> task on the lane's queue    waits for the reply or     by name, runs the task
                                   the worker's sentinel  <-  on a shadow model,
    raises a failure at the        records failures on        replies done/error
    next hook                      the lane

A worker that dies is noticed through its process sentinel (a pidfd) at
once, busy or idle; a training process that dies closes the worker's
lifeline pipe, and the worker exits.
"""
