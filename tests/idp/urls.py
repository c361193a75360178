from django.contrib.auth import views as auth_views
from django.urls import include, path
from oauth2_provider import urls as oauth2_urls

urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    # RFC 8414 locates the metadata of an issuer with a path (.../o) at the origin's root.
    path("", include((oauth2_urls.metadata_urlpatterns, "metadata"))),
]
