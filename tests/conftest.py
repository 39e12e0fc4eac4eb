def pytest_report_header(config):
    import platform

    return f"gptfl-hpc tests on {platform.node()} python {platform.python_version()}"
