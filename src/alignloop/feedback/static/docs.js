// The API page (/docs): Swagger UI from the app's own copy (the fastapi-offline package), started
// here rather than in an inline script, which the app's Content-Security-Policy forbids.
(function () {
  "use strict";
  window.SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    validatorUrl: null, // no request to an outside validator
    deepLinking: true,
  });
})();
