"""A spy on the shared training loop, for tests of either backend (imports neither)."""


def recording(trainer):
    """Wrap the trainer's micro-batches (the loop's hook) and optimizer steps: yielded rollouts in
    order, and the micro-batches of each step."""
    yielded, steps = [], []
    produce, step_gradients = trainer.micro_batches, trainer.step_gradients

    def micro_batches(*args, **kwargs):
        for batch in produce(*args, **kwargs):
            if batch is not None and not any(batch is b for b in yielded):
                yielded.append(batch)
            yield batch

    def record_step(micro):
        steps.append(list(micro))
        return step_gradients(micro)

    trainer.micro_batches, trainer.step_gradients = micro_batches, record_step
    return yielded, steps
