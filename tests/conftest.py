from hypothesis import settings

settings.register_profile("ltg", deadline=None, max_examples=30, print_blob=True)
settings.load_profile("ltg")
