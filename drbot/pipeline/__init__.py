"""The byte pipeline: compression, the encrypted stream format and key providers."""
