"""polymodal.datasets"""

__all__: list[str] = []
