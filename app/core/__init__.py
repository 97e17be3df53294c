"""The torch-free core that the API and the workers share: settings, database, job state, queue."""
