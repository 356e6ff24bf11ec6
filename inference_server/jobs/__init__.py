"""The job contract shared by the API, the workers and the dispatcher."""
