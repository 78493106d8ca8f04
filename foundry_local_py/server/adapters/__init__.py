"""Front-ends: one module per API, turning its wire types into generation asks and its events
into wire chunks (see :class:`..serving.FrontEnd`)."""
