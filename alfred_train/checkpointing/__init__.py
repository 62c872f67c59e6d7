"""The parts of a checkpoint save/resume that `alfred_train.checkpoint` puts together: where files
go (`site`), the manifest and fsync (`manifest`), the in-process writer (`writer`), RNG states
without pickle and the pickle gate (`safety`), the S3 mirror (`mirror`)."""
