// Module resolve hook for Node tests: `vue` imported from static/notify/ (which has no
// node_modules) resolves to tests/js/node_modules/vue, the same copy the tests import, as the
// import map does in the browser and the bundler does in Nuxt.
const here = new URL('./', import.meta.url).href

export async function resolve(specifier, context, next) {
  if (specifier === 'vue' || specifier.startsWith('vue/')) {
    return next(specifier, { ...context, parentURL: here })
  }
  return next(specifier, context)
}
