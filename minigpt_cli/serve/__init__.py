"""``minigpt serve``: an OpenAI-compatible server with continuous batching and a web page.

``server.py`` loads a run and runs uvicorn, ``app.py`` holds the routes, ``api.py`` the
OpenAI requests and responses, ``static/`` the chat page. FastAPI and uvicorn are the
``serve`` extra, imported only here.
"""
