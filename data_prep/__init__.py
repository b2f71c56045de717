"""Data preparation: corpus readers, batched parallel tokenization, FULL-SENTENCES packing, resumable shards.

Command line: ``python -m data_prep {prepare,verify,inspect,fetch-embedded,bench}`` (see docs/data.md).
Library: :class:`data_prep.shards.ShardedTokens`, :func:`data_prep.shards.load_manifest`,
:func:`data_prep.shards.load_token_counts`, :func:`data_prep.embedded.fetch_embedded`,
:func:`data_prep.embedded.resolve_model`, :func:`data_prep.prepare.prepare`. Importing the package is cheap.
"""
