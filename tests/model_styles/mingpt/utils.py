"""minGPT's configuration node, as in mingpt/utils.py."""


class CfgNode:
    """a lightweight configuration class inspired by yacs"""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __str__(self):
        return str(self.__dict__)

    def merge_from_dict(self, d):
        self.__dict__.update(d)
