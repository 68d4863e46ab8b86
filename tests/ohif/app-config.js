/** OHIF v3 (@ohif/app 3.13.2 dist) configuration for tests/test_ohif.py.
 *
 * One DICOMweb data source on the SAME origin as the viewer: tests/ohif/serve.py serves this file at /app-config.js
 * and proxies /dicom-web/* to Orthanc's DICOMweb root, so there is no CORS. Everything is offline: no CDN, no
 * service worker, no study list, no "investigational use" dialog, no CPU-fallback modal (headless, no GPU).
 */
const DICOMWEB = window.location.origin + '/dicom-web'; // http://<same-origin>/dicom-web

window.config = {
  name: 'cxr-triage-node/tests/ohif',
  routerBasename: '/',
  extensions: [],
  modes: [],
  // No onboarding tour (its modal overlay would swallow the test's clicks).
  customizationService: { global: { 'ohif.tours': { $set: [] } } },
  showStudyList: false,
  investigationalUseDialog: { option: 'never' },
  maxNumberOfWebWorkers: 1,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  maxNumRequests: { interaction: 20, thumbnail: 2, prefetch: 4 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Local Orthanc (same-origin proxy)',
        name: 'orthanc',
        wadoUriRoot: DICOMWEB,
        qidoRoot: DICOMWEB,
        wadoRoot: DICOMWEB,
        stowRoot: DICOMWEB,
        qidoSupportsIncludeField: false,
        supportsReject: false,
        supportsStow: false,
        supportsFuzzyMatching: false,
        supportsWildcard: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        staticWado: false,
        singlepart: 'bulkdata,video,pdf',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
        dicomUploadEnabled: false,
      },
    },
  ],
  httpErrorHandler: error => {
    console.warn('OHIF http error', error && error.status);
  },
};
