from twisted.python import usage
from twisted.application.service import MultiService
class Options(usage.Options):
    optParameters = [["config", "c", None, "config"]]
def makeService(config):
    return MultiService()
