"""The Ray shard runner of stage 1: where workers run (`cluster`), the actor that holds one (`actor`), the driver
that owns the shard plan (`runner`) and its progress bar (`progress`)."""
