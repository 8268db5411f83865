"""API and command schemas (pydantic), one module per resource, kept apart from the ORM models.

Read schemas set ``from_attributes=True`` so they validate straight from ORM rows.
"""
