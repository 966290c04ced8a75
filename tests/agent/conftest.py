from tests.agent.fixtures import _one_thread, corpus, tiny_dir, ws  # noqa: F401 (fixtures)
