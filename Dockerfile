# The pg-singleton CLI as an image, for docker-compose.yml. In your own app you add the
# package to your image instead.
FROM node:22-bookworm-slim
WORKDIR /app
COPY package.json package-lock.json ./
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY migrations ./migrations
COPY bench ./bench
COPY bin ./bin
# pg and pg-boss are peer dependencies, an app's own: this image, standing in for an app,
# installs them after dropping the development tools.
RUN npm ci --no-audit --no-fund && npm prune --omit=dev --omit=optional \
  && npm install --no-save --no-audit --no-fund --omit=dev --omit=optional pg@8 pg-boss@12
ENTRYPOINT ["node", "bin/pg-singleton.js"]
