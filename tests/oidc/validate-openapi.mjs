// Validates an OpenAPI document against the OpenAPI 3 schema and checks its references:
//   node validate-openapi.mjs openapi.json
import SwaggerParser from '@apidevtools/swagger-parser';

const file = process.argv[2];
try {
  const api = await SwaggerParser.validate(file);
  console.log(`VALID ${api.info.title} ${api.openapi} (${Object.keys(api.paths).length} paths)`);
} catch (error) {
  console.error(`INVALID ${error.message}`);
  process.exit(1);
}
