"""Taking batches from a training loader in tests."""
from mmrl.data.loader import make_train_loader


def take_batches(cfg, transform, tokenizer, start_step, n_batches):
    """The first ``n_batches`` batches of a loader started at ``start_step`` (running on into the
    next epochs as needed), and the loader, closed."""
    loader = make_train_loader(cfg, transform, tokenizer, start_step=start_step)
    out = []
    while len(out) < n_batches:
        for batch in loader:
            out.append(batch)
            if len(out) == n_batches:
                break
    loader.close()
    return out, loader
