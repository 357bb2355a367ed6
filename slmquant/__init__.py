from .errors import SlmquantError
from .models import load_model, tiny_model, ALIASES

