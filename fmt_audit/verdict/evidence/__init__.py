"""The evidence the verdict methods gather: trigger search, universal ladder, references, smooth images."""
