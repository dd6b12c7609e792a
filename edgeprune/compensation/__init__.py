"""The statistics of every consumer's inputs, the memory they need, and the closed-form compensation solved from
them."""
