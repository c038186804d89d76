"""fcexp: train, sweep and understand fully connected networks on MNIST."""
