"""Process exit codes of `evip run`; launch scripts and SLURM requeue logic read them."""
OK = 0                 # every stage finished
CONFIG_ERROR = 2       # bad config / recipe; nothing was trained
FAILED = 1             # an unexpected error (traceback printed)
RUN_DIR_BUSY = 73      # another live job holds the run dir's lease (evip/lease.py); nothing was touched; do not requeue
CHECKPOINT_IO = 74     # a checkpoint write failed (disk full, I/O error) or no checkpoint is intact; the message
                       # names the intact one to resume from; fix the storage, then rerun (EX_IOERR)
PREEMPTED = 75         # a signal (SIGUSR1/SIGTERM) arrived; a checkpoint was written; rerun to continue (EX_TEMPFAIL)
NON_FINITE = 76        # too many non-finite steps in a row; a checkpoint was written; inspect before rerunning
NO_PROGRESS = 77       # restarted too many times without progress; refusing to loop
BAD_DATA = 78          # a source's bad samples passed data.max_bad_fraction; the last checkpoint is intact; fix the data
