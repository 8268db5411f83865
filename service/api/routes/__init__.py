"""One module per resource, each with its own `APIRouter`; `service.main` includes them."""
